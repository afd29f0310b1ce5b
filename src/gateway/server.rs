//! `orderflow gateway`: a mock payment gateway (being written).
