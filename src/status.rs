//! Order status derived from events (being written).
