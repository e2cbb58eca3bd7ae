//! TEST-ONLY: version 1 of the plugin the shared-mode hot-swap tests
//! deploy (see `../swap-common/shared.rs`). Not an example to copy.

const VERSION: &str = "v1";

include!("../../swap-common/shared.rs");
