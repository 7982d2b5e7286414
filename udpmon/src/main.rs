mod decode;

fn main() {}
