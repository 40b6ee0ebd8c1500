service "web" {
  policy = "write"
  intentions = "read"
}
key_prefix "" { policy = "read" }
operator = "read"
