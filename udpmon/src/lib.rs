//! udpmon as a library: the agent's parts, so that the binary, the benchmarks and the tests
//! share them. Data flows one way: kernel hooks (`probes`) -> ring buffer -> `decode` ->
//! `engine` (pure lifecycle rules) -> `filter` -> `report` (text or JSON) -> output.
//! `agent` runs that loop; `existing` seeds the engine with the sockets open at startup.
pub mod agent;
pub mod btf;
pub mod cli;
pub mod clock;
pub mod container;
pub mod decode;
pub mod engine;
pub mod existing;
pub mod filter;
pub mod flowmap;
pub mod health;
pub mod identity;
pub mod journal;
pub mod metrics;
pub mod netns;
pub mod output;
pub mod pipeline;
pub mod privileges;
pub mod probes;
pub mod procfs;
pub mod report;
pub mod sinks;
pub mod sock_diag;
