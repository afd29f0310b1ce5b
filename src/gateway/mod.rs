//! The payment gateway: an HTTP client that performs the payment stage's requests, and
//! `orderflow gateway`, a mock gateway that behaves like a bank (being written).

pub mod client;
pub mod server;
