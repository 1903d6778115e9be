//! The control loops: the controller that reconciles the registry into both
//! planes, the rollout policies that walk candidates, and the experiments
//! file watcher.
pub mod controller;
pub mod experiments_file;
pub mod rollout;
