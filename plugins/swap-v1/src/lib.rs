//! TEST-ONLY: version 1 of the plugin the hot-swap tests deploy (see
//! `../swap-common/handler.rs`). Not an example to copy.

const VERSION: &str = "v1";

include!("../../swap-common/handler.rs");
