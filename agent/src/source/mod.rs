//! Config sources: where the cluster's objects come from.
//!
//! Today a directory of Kubernetes YAML ([`dir::DirSource`]); later the
//! Kubernetes API. Every source feeds the same [`crate::state::Store`].

#![forbid(unsafe_code)]

pub mod dir;
pub mod objects;
pub mod services;
