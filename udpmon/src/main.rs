mod btf;
mod cli;
mod decode;
mod engine;
mod report;
mod existing;

fn main() {}
