//! Bytes pinned against the references and the simulator checked on its own: golden
//! vectors from the plugin's serializers, upgrade signatures (plugin and botocore
//! vectors), the simulator's service API and data plane driven by hand-built clients
//! and by the AWS SDK. No daemon runs here.
//!
//! One binary for all of them (each test binary links the whole product).

#[path = "../sim_util/mod.rs"]
mod sim_util;

mod golden_vectors;
mod sim_dataplane;
mod sim_sdk;
mod sim_service;
mod upgrade_signature;
