//! Nodeward's agent: one per node, capturing enrolled pods' TCP connections
//! with eBPF and proxying them (see ARCHITECTURE.md for the data path).

mod admin;
pub mod agent;
pub mod audit;
pub mod ca_service;
pub mod capture;
pub mod cni;
pub mod config;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod identity;
pub mod logging;
pub mod memory;
mod metrics;
mod netns;
mod outcome;
mod pods;
#[cfg(feature = "testing")]
pub mod policy;
#[cfg(not(feature = "testing"))]
pub(crate) mod policy;
#[cfg(feature = "testing")]
pub mod proxy;
#[cfg(not(feature = "testing"))]
pub(crate) mod proxy;
mod source;
#[cfg(feature = "testing")]
pub mod state;
#[cfg(not(feature = "testing"))]
pub(crate) mod state;
pub mod takeover;
pub mod verify;
