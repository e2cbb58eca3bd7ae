module wharf.example/go-echo

go 1.24
