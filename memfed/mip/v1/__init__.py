"""Generated MIP v1 protobuf and gRPC code (``make proto``). Do not edit the generated modules by hand."""
