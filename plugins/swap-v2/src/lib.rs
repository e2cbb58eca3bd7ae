//! TEST-ONLY: version 2 of the plugin the hot-swap tests deploy (see
//! `../swap-common/handler.rs`). Not an example to copy.

const VERSION: &str = "v2";

include!("../../swap-common/handler.rs");
