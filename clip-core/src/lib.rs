pub mod digest;
pub mod gzip;
pub mod reference;
pub use digest::Digest;
pub use reference::Reference;
