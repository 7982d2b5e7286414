mod btf;
mod decode;

fn main() {}
