pub mod digest;
pub mod gzip;
pub mod index;
pub mod reference;
pub use digest::Digest;
pub use reference::Reference;
