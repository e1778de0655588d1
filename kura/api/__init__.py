"""The public HTTP API: Klein routes, head-time admission, twisted.web glue."""
