architecture  = "x86_64"
instance_type = "t3.small"
