//! tokend: one dedicated refresher per OAuth token, publishing it to files that every other
//! program on the machine reads.

pub mod fake;
pub mod logging;
pub mod secret;
pub mod shutdown;
