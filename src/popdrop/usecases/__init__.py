"""Use cases that span several domains (GDPR access and erasure; later checkout and
reports). They sit above every domain they orchestrate, so no domain reaches into another
to do them."""
