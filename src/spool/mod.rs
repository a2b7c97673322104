//! Durable on-disk queue (see DESIGN.md, "Spool on disk").
