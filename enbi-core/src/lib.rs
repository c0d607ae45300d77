//! enbi's API and decisions. Everything here is a pure function of what the operator observed
//! (and `now`, passed in): no client, no clock, no I/O, so every decision is tested in isolation.

pub mod backoff;
pub mod capacity;
pub mod census;
pub mod conditions;
pub mod crd;
pub mod defaults;
pub mod event;
pub mod fault;
pub mod fetch;
pub mod gc;
pub mod image_archive;
pub mod job;
pub mod keys;
pub mod machine;
pub mod naming;
pub mod optin;
pub mod placement;
pub mod pod;
pub mod policy;
pub mod reason;
pub mod reference;
pub mod release;
pub mod report;
pub mod resources;
pub mod servingcert;
pub mod spread;
pub mod system;
pub mod trace;
pub mod validation;
