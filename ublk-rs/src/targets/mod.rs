//! Ready-made targets.

pub mod nbd;
