//! End-to-end tests: the real `bastiond`, `bastionctl` and drop-in against the
//! simulator, moto_server, PostgreSQL, MariaDB and the AWS CLI, over real sockets.
//!
//! One test binary instead of one per file: each links the whole product and the SDKs,
//! so one link saves minutes of build. `cargo test --test e2e resilience::` runs one
//! module.

#[path = "../e2e_util/mod.rs"]
mod e2e_util;
#[path = "../sim_util/mod.rs"]
mod sim_util;

mod awscli_dropin;
mod control_api;
mod daemon_e2e;
mod ec2_tags;
mod logging_levels;
mod mariadb_e2e;
mod ondemand;
mod ondemand_clouds;
mod plugin_dropin;
mod resilience;
mod sim_ec2;
