//! weft's API: protobuf definitions (`weft.v1`) and shared domain types.
