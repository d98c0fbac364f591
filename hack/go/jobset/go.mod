// Wrapper module that builds the JobSet controller pinned in hack/versions.env (the module
// proxy refuses sigs.k8s.io/jobset's version list, which `go install pkg@version` reads).
module kubetron.local/hack/jobset

go 1.26.0

require sigs.k8s.io/jobset v0.12.0
