mod btf;
mod decode;
mod engine;

fn main() {}
