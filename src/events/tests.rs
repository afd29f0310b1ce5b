//! Codec and wire-type tests.
