module kubetron.local/hack/pause

go 1.22
