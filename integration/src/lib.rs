//! Integration test helpers live in tests/.
