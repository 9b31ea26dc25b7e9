//! The benchmark's load: WebSocket readers, a Redis subscriber and
//! publisher, latency histograms, and the rig that ties a bridge to readers.

mod connect;
mod histogram;
mod reader;
mod redis_load;
mod rig;

pub use self::connect::{Socket, connect_sockets};
pub use self::histogram::{Latency, collect};
pub use self::reader::spawn_readers;
pub use self::redis_load::{
    RedisAt, publish_and_await_results, publish_paced, publisher, spawn_subscriber,
};
pub use self::rig::{rig, wait_for};
