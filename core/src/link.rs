//! (placeholder until this machine lands)
