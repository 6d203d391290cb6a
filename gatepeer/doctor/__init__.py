"""`gatepeer doctor`: pre-flight and live checks, one line each.

- `runner`: loads the config, reads the API and the kernel, asks the judgments in order, and
  renders the report (what `gatepeer doctor` prints);
- `judgments`: pure functions from readings to one `Check` each (no I/O, no kernel or AWS
  imports at run time);
- `aws`: the EC2 readings (IMDS, EC2, IAM dry runs) and their judgments.
"""
