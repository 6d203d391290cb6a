architecture  = "arm64"
instance_type = "t4g.small"
