mod btf;
mod decode;
mod engine;
mod existing;

fn main() {}
