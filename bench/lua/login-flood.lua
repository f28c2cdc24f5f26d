-- A flood of logins of a user with a real (bcrypt cost 10) password hash.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"username":"demo","password":"demo-password"}'
