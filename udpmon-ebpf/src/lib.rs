#![no_std]
// The programs live in the `udpmon` bin target (src/main.rs); this library target only exists
// so that `udpmon` can name this crate as a build-dependency.
