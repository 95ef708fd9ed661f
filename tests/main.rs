//! Integration tests: one module per tests/<file>.rs.
mod tree;
