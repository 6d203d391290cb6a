# gatepeer's AMI: Debian 12 (Debian's own AMIs), provisioned by scripts/provision.sh from a
# bundle made by scripts/bundle.sh. One architecture per build; see x86_64.pkrvars.hcl and
# arm64.pkrvars.hcl, and docs/image.md for the release pipeline.

variable "architecture" {
  type        = string
  description = "x86_64 or arm64 (EC2's names)."
}

variable "instance_type" {
  type        = string
  description = "The build instance; its architecture must match var.architecture."
}

variable "region" {
  type    = string
  default = "ap-northeast-1"
}

variable "bundle_dir" {
  type        = string
  description = "Directory made by `scripts/bundle.sh OUT` (wheel, unit, provision.sh)."
  default     = "dist/bundle"
}

variable "gatepeer_version" {
  type        = string
  description = "Goes into the AMI's name and tags."
}

variable "ssm_agent_key_file" {
  type        = string
  description = "AWS's public key for the SSM Agent packages, copied from \"Verifying the signature of SSM Agent\" (Systems Manager user guide); ssm-agent.sh refuses it unless its fingerprint is the one pinned there."
  default     = "ssm-agent-public-key.asc"
}

variable "ami_regions" {
  type        = list(string)
  description = "Other regions to copy the AMI to."
  default     = []
}

locals {
  # Debian names its images by Debian architecture names.
  debian_arch = var.architecture == "arm64" ? "arm64" : "amd64"
  timestamp   = formatdate("YYYYMMDDhhmm", timestamp())
}

source "amazon-ebs" "debian12" {
  region        = var.region
  instance_type = var.instance_type
  ami_name      = "gatepeer-${var.gatepeer_version}-debian-12-${local.debian_arch}-${local.timestamp}"
  ami_regions   = var.ami_regions

  source_ami_filter {
    filters = {
      name                = "debian-12-${local.debian_arch}-*"
      architecture        = var.architecture
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = ["136693071363"] # Debian
    most_recent = true
  }
  ssh_username = "admin"

  # Instances launched from the AMI accept IMDSv2 only, and so does the build instance.
  imds_support = "v2.0"
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  ena_support = true

  tags = {
    Name             = "gatepeer ${var.gatepeer_version} (Debian 12, ${var.architecture})"
    gatepeer_version = var.gatepeer_version
    base_ami         = "{{ .SourceAMI }}"
  }
}

build {
  sources = ["source.amazon-ebs.debian12"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/gatepeer-bundle"]
  }

  provisioner "file" {
    source      = "${var.bundle_dir}/"
    destination = "/tmp/gatepeer-bundle"
  }

  # An operator path without a key pair or an inbound port: Session Manager. The package is
  # installed only with a good signature by AWS's pinned key (ssm-agent.sh).
  provisioner "file" {
    source      = "${path.root}/ssm-agent.sh"
    destination = "/tmp/ssm-agent.sh"
  }

  provisioner "file" {
    source      = var.ssm_agent_key_file
    destination = "/tmp/ssm-agent-public-key.asc"
  }

  provisioner "shell" {
    inline = [
      "sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq",
      "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends curl gpg",
      "sudo bash /tmp/ssm-agent.sh install ${var.region} ${local.debian_arch} /tmp/ssm-agent-public-key.asc",
      "rm -f /tmp/ssm-agent.sh /tmp/ssm-agent-public-key.asc",
    ]
  }

  provisioner "shell" {
    inline = [
      "sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq",
      "sudo DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq",
      "sudo bash /tmp/gatepeer-bundle/provision.sh /tmp/gatepeer-bundle",
      "rm -rf /tmp/gatepeer-bundle",
      # The first boot of each instance runs its own user-data from a clean slate.
      "sudo cloud-init clean --logs",
    ]
  }
}
