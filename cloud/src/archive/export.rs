//! Exporting a time range of the archive for other engines (filled in below).
