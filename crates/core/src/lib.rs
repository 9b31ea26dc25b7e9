//! quotebridge's core: the quote parser, the moving average, the wire
//! formats, the name rules and the counters. No I/O, no async runtime and no
//! web framework: every other crate builds on these, and they are tested on
//! their own.

#![forbid(unsafe_code)]

pub mod decimal;
pub mod frame;
pub mod idle;
pub mod names;
pub mod protocol;
pub mod quote;
pub mod series;
pub mod sma;
pub mod stats;
mod sum;
