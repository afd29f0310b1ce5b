//! Fraud screening (placeholder until the stage lands).
