//! Ready-made targets other servers can use as they are.

pub mod fault_inject;
pub mod stripe;

pub use fault_inject::FaultInject;
pub use stripe::StripeTarget;
