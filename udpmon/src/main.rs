mod btf;
mod decode;
mod engine;
mod report;
mod existing;

fn main() {}
