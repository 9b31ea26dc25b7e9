//! Indicators beyond the moving average of `crate::sma`, each a pure,
//! synchronous computation over one key's quotes: no I/O, no clock.

pub mod candles;
pub mod ema;
pub mod rolling;
pub mod timed;
pub mod total;
