//! Where quotes come in: a Redis subscription ([`pubsub`], the seed's
//! `ThreadedRedisMessageListener`), or a Redis stream read through a consumer
//! group ([`durable`], nothing lost and nothing applied twice).

pub(crate) mod durable;
pub(crate) mod pubsub;
