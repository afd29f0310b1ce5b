//! Traffic simulator and carrier player behind `orderflow load` (being written).
