//! Integration tests; one module per area.
mod chat;
mod data;
