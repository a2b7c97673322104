//! Delivery to Exchange Online: reply classification, the upstream SMTP session, and the
//! scheduler that drains the spool at the pace Microsoft allows.

pub mod classify;
pub mod reply;
