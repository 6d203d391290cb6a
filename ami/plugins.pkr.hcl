# The plugin this template needs. Kept in a file of its own because Debian 12's packer (1.6.6,
# used by CI for `fmt -check` and `validate -syntax-only`) predates `required_plugins` and
# `packer init`; CI validates the other files. The release pipeline runs `packer init ami/`.
packer {
  required_version = ">= 1.10.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = "~> 1.3"
    }
  }
}
