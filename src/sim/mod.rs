//! Entra ID + Exchange Online simulator (see issue 3).
