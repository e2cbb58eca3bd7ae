//! TEST-ONLY: version 2 of the plugin the shared-mode hot-swap tests
//! deploy (see `../swap-common/shared.rs`). Not an example to copy.

const VERSION: &str = "v2";

include!("../../swap-common/shared.rs");
