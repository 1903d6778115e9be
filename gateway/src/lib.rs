//! Switchyard's gateway as a library: the HTTP and gRPC fronts (`api`), the
//! route table and the registry, the controller, and the server that ties
//! them together (`server`). The `switchyard` binary is its command line.
pub mod api;
pub mod auth;
pub mod config;
pub mod console;
pub mod control;
pub mod dispatch;
pub mod divergence;
pub mod experiment_stats;
pub mod fuzz;
pub mod http1;
pub mod http1_server;
pub mod kserve_client;
pub mod limits;
pub mod models;
pub mod offload;
pub mod params;
pub mod plane;
pub mod registry;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod upstream_pool;
